"""The Prometheus alert rules (deploy/prometheus) and the Grafana dashboard (deploy/grafana).

``promtool`` (Debian's ``prometheus`` package) checks the rules and runs their unit tests
(deploy/prometheus/tests/*.yaml: every alert fires on synthetic series that should page and
stays quiet on series that should not); it also parses every dashboard query as PromQL. Without
``promtool`` those tests skip with the reason, unless ``MESH_REQUIRE_PROMTOOL=1``: then they fail.

Every metric name used by a rule or a panel must be one the mesh exports (the metric names
contract, :data:`CONTRACT`), so a renamed metric cannot leave a silent dashboard or a dead alert.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "connector-mesh-rules.yaml"
RULE_TESTS = sorted((ROOT / "deploy" / "prometheus" / "tests").glob("*.yaml"))
DASHBOARD = ROOT / "deploy" / "grafana" / "connector-mesh.json"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning.yaml"
README = ROOT / "README.md"

CONTRACT = frozenset(
    {
        # agents (mesh/metrics.py)
        "mesh_captured_messages_total",
        "mesh_published_messages_total",
        "mesh_consumed_messages_total",
        "mesh_retried_messages_total",
        "mesh_dead_lettered_messages_total",
        "mesh_failures_total",
        "mesh_end_to_end_latency_seconds",
        "mesh_flow_freshness_seconds",
        "mesh_slo_target_seconds",
        "mesh_slo_changes_total",
        "mesh_slo_changes_on_time_total",
        "mesh_outbox_depth_messages",
        "mesh_outbox_oldest_age_seconds",
        "mesh_flow_outbox_depth_messages",
        "mesh_flow_outbox_oldest_age_seconds",
        "mesh_consumer_pending_messages",
        "mesh_nats_connected",
        # control plane (mesh/controlplane/metrics.py)
        "mesh_cp_agents",
        "mesh_cp_leader",
        "mesh_cp_agent_heartbeat_age_seconds",
        "mesh_cp_flow_backlog_messages",
        "mesh_cp_flow_consumer_pending_messages",
        "mesh_cp_flow_lag_seconds",
        "mesh_cp_flow_dead_letters_messages",
        "mesh_cp_flow_dead_letters_oldest_age_seconds",
        "mesh_cp_flow_applied_total",
        "mesh_cp_flow_failures_total",
        "mesh_cp_flow_retries_total",
        "mesh_cp_flow_latency_seconds",
        "mesh_cp_flow_freshness_seconds",
        "mesh_cp_flow_slo_ratio",
    }
)
"""The metric names contract shared with the metrics implementation (issue 15, item 1)."""
HISTOGRAMS = frozenset({"mesh_end_to_end_latency_seconds"})
SEVERITIES = {"critical", "warning", "info"}


def _promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        reason = "promtool not found (apt-get install prometheus)"
        if os.environ.get("MESH_REQUIRE_PROMTOOL") == "1":
            pytest.fail(f"{reason} (and MESH_REQUIRE_PROMTOOL=1)")
        pytest.skip(reason)
    return tool


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120, cwd=cwd)


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _alerts() -> list[dict[str, Any]]:
    return [r for r in _rules() if "alert" in r]


def _dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return doc


def _panels(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for panel in doc["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def _exprs(doc: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in _panels(doc) for t in p.get("targets", []) if "expr" in t]


_GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$flow": ".*"}


def _as_promql(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced by values Prometheus accepts."""
    for var, value in _GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


_FUNCTION_OR_KEYWORD = frozenset(
    {"and", "or", "unless", "bool", "offset", "inf", "nan", "group_left", "group_right"}
)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (label names, functions and strings aside)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\$\{?\w+\}?", " ", s)
    names = set()
    for match in re.finditer(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", s):
        if match.group(2) is None and match.group(1) not in _FUNCTION_OR_KEYWORD:
            names.add(match.group(1))
    return names


def _known(name: str, recorded: set[str]) -> bool:
    if name in CONTRACT or name in recorded:
        return True
    base, _, suffix = name.rpartition("_")
    return suffix in {"bucket", "sum", "count"} and base in HISTOGRAMS


# -- promtool ------------------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    tool = _promtool()
    done = _run(tool, "check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in done.stdout


def test_promtool_check_rules_refuses_a_broken_rule(tmp_path: Path) -> None:
    """The check is not a no-op: a rule with a PromQL syntax error is refused."""
    tool = _promtool()
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        RULES.read_text(encoding="utf-8").replace(
            "expr: mesh_flow_outbox_oldest_age_seconds > 300",
            "expr: mesh_flow_outbox_oldest_age_seconds > > 300",
        ),
        encoding="utf-8",
    )
    assert broken.read_text(encoding="utf-8") != RULES.read_text(encoding="utf-8")
    done = _run(tool, "check", "rules", str(broken))
    assert done.returncode != 0
    assert "parse error" in done.stdout + done.stderr


@pytest.mark.parametrize("test_file", RULE_TESTS, ids=[p.name for p in RULE_TESTS])
def test_promtool_rule_unit_tests(test_file: Path) -> None:
    tool = _promtool()
    done = _run(tool, "test", "rules", str(test_file))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


_FAST_BURN = "flow:mesh_slo_late_ratio:rate1h > (14.4 * 0.01)\n          {op}\n"
MUTANTS = [
    pytest.param("_seconds > 300\n", "_seconds > 3000\n", id="threshold"),
    pytest.param(_FAST_BURN.format(op="and"), _FAST_BURN.format(op="or"), id="multi-window"),
    pytest.param("unless on (flow)", "and on (flow)", id="stuck-consumer"),
]


@pytest.mark.parametrize(("old", "new"), MUTANTS)
def test_rule_unit_tests_catch_a_wrong_rule(tmp_path: Path, old: str, new: str) -> None:
    """The unit tests bite: a changed threshold, a single-window burn rule, or a stuck-consumer
    rule that needs consumption to fire each make ``promtool test rules`` fail."""
    tool = _promtool()
    text = RULES.read_text(encoding="utf-8")
    assert old in text
    (tmp_path / "tests").mkdir()
    (tmp_path / RULES.name).write_text(text.replace(old, new), encoding="utf-8")
    for test_file in RULE_TESTS:
        shutil.copy(test_file, tmp_path / "tests" / test_file.name)
    done = _run(tool, "test", "rules", *[f"tests/{p.name}" for p in RULE_TESTS], cwd=tmp_path)
    assert done.returncode != 0, done.stdout
    assert "FAILED" in done.stdout + done.stderr


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each panel query (as a recording rule), Grafana variables substituted."""
    tool = _promtool()
    exprs = _exprs(_dashboard())
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": _as_promql(e)} for i, e in enumerate(exprs)
    ]}]}  # fmt: skip
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    done = _run(tool, "check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in done.stdout


# -- the rules -----------------------------------------------------------------------------


def test_metric_names_are_parsed_out_of_exprs() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (flow, le) (rate(mesh_end_to_end_latency_seconds_bucket"
        '{flow=~"$flow"}[$__rate_interval]))) / on (flow) group_left max without (instance) '
        '(mesh_cp_agents{health="lost"} offset 5m) unless other:recorded:rate5m > bool 1e3'
    )
    assert metric_names(expr) == {
        "mesh_end_to_end_latency_seconds_bucket",
        "mesh_cp_agents",
        "other:recorded:rate5m",
    }


def test_rules_use_only_contract_metric_names() -> None:
    recorded = {r["record"] for r in _rules() if "record" in r}
    for rule in _rules():
        unknown = {n for n in metric_names(rule["expr"]) if not _known(n, recorded)}
        assert not unknown, f"{rule.get('alert') or rule.get('record')}: {sorted(unknown)}"


def test_the_required_alerts_exist() -> None:
    """Issue 15: outbox age, stale or lost agents, DLQ growth, consumer lag, SLO burn (two windows)."""
    by_name = {a["alert"]: a for a in _alerts()}
    used = {name: metric_names(a["expr"]) for name, a in by_name.items()}
    assert "mesh_flow_outbox_oldest_age_seconds" in used["MeshOutboxStuck"]
    assert "mesh_cp_agent_heartbeat_age_seconds" in used["MeshAgentStale"]
    assert "mesh_cp_agent_heartbeat_age_seconds" in used["MeshAgentLost"]
    assert "mesh_dead_lettered_messages_total" in used["MeshDeadLettersGrowing"]
    assert "mesh_cp_flow_consumer_pending_messages" in used["MeshConsumerLagHigh"]
    for burn in ("MeshSloFastBurn", "MeshSloSlowBurn"):
        windows = {n.rsplit(":", 1)[1] for n in used[burn]}
        assert len(windows) == 2, f"{burn} is not multi-window: {windows}"


def test_every_alert_has_severity_summary_description_and_a_runbook() -> None:
    readme = README.read_text(encoding="utf-8")
    section = readme.split("### Grafana and alert rules", 1)[1].split("\n## ", 1)[0]
    for alert in _alerts():
        name = alert["alert"]
        assert alert["labels"]["severity"] in SEVERITIES, name
        annotations = alert["annotations"]
        assert annotations["summary"].strip(), name
        description = annotations["description"]
        runbook = re.search(r"Runbook: README, Grafana and alert rules, (\w+)\.$", description)
        assert runbook, f"{name}: the description does not end with its runbook entry"
        entry = runbook.group(1)
        assert f"**{entry}**" in section, f"{name}: no runbook paragraph {entry} in README"


def test_every_alert_is_tested_firing_and_quiet() -> None:
    fired: set[str] = set()
    quiet: set[str] = set()
    for test_file in RULE_TESTS:
        doc = yaml.safe_load(test_file.read_text(encoding="utf-8"))
        for case in doc["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {a["alert"] for a in _alerts()}
    assert names - fired == set(), "never tested firing"
    assert names - quiet == set(), "never tested quiet"


# -- the dashboard -------------------------------------------------------------------------


def test_dashboard_is_provisioning_ready() -> None:
    doc = _dashboard()
    assert doc["uid"] == "connector-mesh"
    assert isinstance(doc["schemaVersion"], int)
    assert doc["schemaVersion"] >= 36
    assert doc.get("id") is None, "a provisioned dashboard carries no database id"
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["flow"]["type"] == "query"
    provisioning = yaml.safe_load(PROVISIONING.read_text(encoding="utf-8"))
    assert provisioning["apiVersion"] == 1
    (provider,) = provisioning["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"]


def test_dashboard_panels_are_well_formed() -> None:
    doc = _dashboard()
    panels = _panels(doc)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        where = f"panel {panel['id']} {panel.get('title')!r}"
        pos = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= pos.keys(), where
        assert pos["x"] >= 0, where
        assert pos["x"] + pos["w"] <= 24, where
        assert pos["h"] > 0, where
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{where} overlaps another panel"
                cells.add((x, y))
        if panel["type"] == "row":
            continue
        assert panel["type"] in {"timeseries", "stat", "table", "gauge", "bargauge"}, where
        assert panel["title"].strip(), where
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        targets = panel["targets"]
        assert targets, where
        ref_ids = [t["refId"] for t in targets]
        assert len(ref_ids) == len(set(ref_ids)), where
        for target in targets:
            assert target["expr"].strip(), where
            assert target["datasource"]["uid"] == "${datasource}", where


def test_dashboard_uses_only_contract_metric_names() -> None:
    for expr in _exprs(_dashboard()):
        names = metric_names(expr)
        assert names, expr
        unknown = {n for n in names if not _known(n, set())}
        assert not unknown, f"{expr}: {sorted(unknown)}"


def test_dashboard_covers_the_kpis() -> None:
    """Per flow: throughput, latency p50/p99, failures by class, retries, backlog, DLQ depth and
    age, freshness, SLO; and agents by health."""
    exprs = "\n".join(_exprs(_dashboard()))
    for needle in (
        "mesh_captured_messages_total",
        'outcome="applied"',
        "histogram_quantile(0.5, sum by (flow, le) (rate(mesh_end_to_end_latency_seconds_bucket",
        "histogram_quantile(0.99, sum by (flow, le) (rate(mesh_end_to_end_latency_seconds_bucket",
        "sum by (flow, error_class) (rate(mesh_failures_total",
        "mesh_retried_messages_total",
        "mesh_cp_flow_backlog_messages",
        "mesh_cp_flow_consumer_pending_messages",
        "mesh_cp_flow_dead_letters_messages",
        "mesh_cp_flow_dead_letters_oldest_age_seconds",
        "mesh_flow_freshness_seconds",
        "mesh_slo_changes_on_time_total",
        "max by (health) (mesh_cp_agents)",
        "mesh_cp_agent_heartbeat_age_seconds",
    ):
        assert needle in exprs, needle
    per_flow = [e for e in _exprs(_dashboard()) if 'flow=~"$flow"' in e]
    assert len(per_flow) >= 15


def test_the_helm_prometheus_rule_passes_promtool(tmp_path: Path) -> None:
    """The chart's PrometheusRule (the deployed groups plus its scrape alerts) is valid Prometheus."""
    tool = _promtool()
    from tests.deploy.test_helm_chart import render

    (rule,) = [
        d
        for d in render({"monitoring": {"prometheusRule": {"enabled": True}}})
        if d["kind"] == "PrometheusRule"
    ]
    path = tmp_path / "chart-rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]), encoding="utf-8")
    done = _run(tool, "check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(_rules()) + 2} rules found" in done.stdout
