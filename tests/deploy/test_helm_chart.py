"""The Helm chart (helm/connector-mesh), checked without a cluster and without a helm binary.

Helm's own lint (strict) and template engine run through ``helm-python-sdk`` (Helm's Go SDK as
a C library); every rendered manifest goes through ``kubernetes-validate --strict`` for several
Kubernetes versions; the custom resources (ServiceMonitor, PrometheusRule), which have no schema
there, are checked against the parts of the prometheus-operator CRD schemas the chart relies on;
the values schema must refuse bad values; and each rendered agent config must pass
``meshctl config check``.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml  # type: ignore[import-untyped]

from mesh.broker import free_port
from mesh.readiness import NotReady, wait_ready
from tests._secure import SecuredNatsServer

pytestmark = [pytest.mark.integration]

CHART = Path(__file__).resolve().parents[2] / "helm" / "connector-mesh"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
KUBE_VERSIONS = ["1.27.0", "1.33.0"]
STATE_MOUNT = "/var/lib/mesh"
"""Where the chart mounts an agent's state volume (the agent's ``state_dir``)."""

# The parts of the prometheus-operator CRDs (monitoring.coreos.com/v1) the chart relies on: the
# fields the CRDs mark required and the types of the fields the chart sets.
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string"}, "labels": _LABELS},
}
CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "ServiceMonitor": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "additionalProperties": False,
                "properties": {
                    "selector": {"type": "object", "properties": {"matchLabels": _LABELS}},
                    "namespaceSelector": {
                        "type": "object",
                        "properties": {"matchNames": {"type": "array", "items": {"type": "string"}}},
                    },
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string"},
                                "interval": {
                                    "type": "string",
                                    "pattern": "^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
                                },
                            },
                        },
                    },
                },
            },
        },
    },
    "PrometheusRule": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "groups": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {
                                "name": {"type": "string", "minLength": 1},
                                "rules": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["expr"],
                                        "additionalProperties": False,
                                        "properties": {
                                            "alert": {"type": "string"},
                                            "record": {"type": "string"},
                                            "expr": {"type": "string", "minLength": 1},
                                            "for": {"type": "string"},
                                            "labels": _LABELS,
                                            "annotations": _LABELS,
                                        },
                                        "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                    },
                                },
                            },
                        },
                    }
                },
            },
        },
    },
}


def load_values(path: Path | None) -> dict[str, Any] | None:
    return None if path is None else yaml.safe_load(path.read_text())


def render(values: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Render like ``helm template`` (schema first, as install does); the manifests, NOTES.txt aside."""
    chart = helm.Chart.load(CHART)
    chart.validate_schema(values)
    rendered = chart.render(values, name="mesh", namespace="mesh", is_install=True)
    docs: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt") or path.endswith(".tpl"):
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


CASES = [pytest.param(None, id="defaults")] + [pytest.param(p, id=p.name) for p in CI_VALUES]


def test_there_is_a_ci_values_file() -> None:
    assert CI_VALUES, "helm/connector-mesh/ci/*-values.yaml: none"


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values_file", CASES)
def test_lint_strict(values_file: Path | None, kube_version: str) -> None:
    report = helm.lint(CHART, load_values(values_file), strict=True, kube_version=f"v{kube_version}")
    assert report["total_charts_linted"] == 1
    assert report["errors"] == [], report
    assert report["messages"] == [], report


def test_lint_finds_problems() -> None:
    """Lint is not a no-op: a value of the wrong type is an error."""
    report = helm.lint(CHART, {"controlPlane": {"replicas": "two"}}, strict=True)
    assert report["errors"] or any(m["severity"] >= 2 for m in report["messages"]), report


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values_file", CASES)
def test_manifests_validate(values_file: Path | None, kube_version: str) -> None:
    docs = render(load_values(values_file))
    assert docs
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in CRD_SCHEMAS:
            jsonschema.validate(doc, CRD_SCHEMAS[doc["kind"]])
            continue
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:  # pragma: no cover - the message is the point
            pytest.fail(f"{where} on {kube_version}: {exc.message} at {list(exc.path)}")


def kinds(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        out.setdefault(doc["kind"], []).append(doc)
    return out


def test_defaults_control_plane_ha() -> None:
    docs = kinds(render(None))
    (deploy,) = docs["Deployment"]
    assert deploy["spec"]["replicas"] == 2
    pod = deploy["spec"]["template"]["spec"]
    assert "podAntiAffinity" in pod["affinity"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "--http=0.0.0.0:8080" in container["args"]
    assert docs["PodDisruptionBudget"][0]["spec"]["minAvailable"] == 1
    assert "StatefulSet" not in docs
    for kind in ("Ingress", "ServiceMonitor", "PrometheusRule", "NetworkPolicy"):
        assert kind not in docs


def test_every_option_on() -> None:
    (values_file,) = [p for p in CI_VALUES if p.name == "all-values.yaml"]
    values = load_values(values_file)
    assert values is not None
    docs = kinds(render(values))
    for kind in (
        "Ingress",
        "ServiceMonitor",
        "PrometheusRule",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Secret",
    ):
        assert kind in docs, kind
    assert len(docs["StatefulSet"]) == len(values["agents"])
    (deploy,) = docs["Deployment"]
    cp = deploy["spec"]["template"]["spec"]
    assert "--security-dir=/etc/mesh/security" in cp["containers"][0]["args"]
    security = next(v for v in cp["volumes"] if v["name"] == "security")
    assert security["secret"]["secretName"] == "mesh-security"
    assert {"key": "creds.control-plane.creds", "path": "creds/control-plane.creds"} in security["secret"][
        "items"
    ]
    for sts in docs["StatefulSet"]:
        spec = sts["spec"]
        assert spec["volumeClaimTemplates"][0]["metadata"]["name"] == "state"
        pod = spec["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for container in pod["containers"] + pod["initContainers"]:
            ctx = container["securityContext"]
            assert ctx["readOnlyRootFilesystem"] is True
            assert ctx["allowPrivilegeEscalation"] is False
            assert ctx["capabilities"]["drop"] == ["ALL"]
        (agent,) = pod["containers"]
        assert agent["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        assert agent["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert {"name": "state", "mountPath": STATE_MOUNT} in agent["volumeMounts"]
        name = sts["metadata"]["labels"]["connector-mesh/agent"]
        entry = next(a for a in values["agents"] if a["name"] == name)
        grace = entry.get("shutdownGrace", values.get("agentDefaults", {}).get("shutdownGrace", 10))
        assert pod["terminationGracePeriodSeconds"] > grace
    created = docs["Secret"]
    assert [s["metadata"]["name"] for s in created] == ["mesh-connector-mesh-erp-agent-creds"]


def agent_configs(docs: list[dict[str, Any]]) -> dict[str, str]:
    return {
        doc["metadata"]["name"]: doc["data"]["agent.toml"]
        for doc in docs
        if doc["kind"] == "ConfigMap" and "agent.toml" in doc.get("data", {})
    }


@pytest.mark.parametrize("values_file", CI_VALUES, ids=[p.name for p in CI_VALUES])
def test_rendered_agent_config_passes_config_check(values_file: Path, tmp_path: Path) -> None:
    """The ConfigMap's agent.toml, with the pod's mount points moved under tmp_path (the state
    volume, the creds and CA mounts), is a valid agent config for this codebase."""
    configs = agent_configs(render(load_values(values_file)))
    assert configs, f"{values_file.name}: no agent ConfigMap"
    for name, text in configs.items():
        root = tmp_path / name
        text = text.replace(STATE_MOUNT, str(root / "state")).replace("/etc/mesh/", f"{root}/etc/")
        (root / "etc" / "nats-ca").mkdir(parents=True)
        (root / "etc" / "nats-ca" / "ca.crt").write_text("placeholder\n")
        config = root / "agent.toml"
        config.write_text(text)
        done = subprocess.run(
            [sys.executable, "-m", "mesh", "config", "check", str(config)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, f"{name}:\n{text}\n{done.stdout}{done.stderr}"
        assert "ok" in done.stdout


def with_agent(**changes: Any) -> dict[str, Any]:
    agent: dict[str, Any] = {
        "name": "erp-agent",
        "system": "erp",
        "credentials": {"existingSecret": "erp-creds"},
    }
    agent.update(changes)
    return {"agents": [agent]}


BAD_VALUES = [
    pytest.param({"unknownTopLevel": 1}, id="unknown-top-level-key"),
    pytest.param({"controlPlane": {"replica": 2}}, id="unknown-nested-key"),
    pytest.param({"controlPlane": {"replicas": "2"}}, id="replicas-string"),
    pytest.param({"controlPlane": {"replicas": 0}}, id="replicas-zero"),
    pytest.param({"controlPlane": {"antiAffinity": "maybe"}}, id="anti-affinity-enum"),
    pytest.param({"nats": {"url": "http://nats:4222"}}, id="nats-url-scheme"),
    pytest.param({"image": {"pullPolicy": "Sometimes"}}, id="pull-policy"),
    pytest.param({"agentDefaults": {"metricsPort": 70000}}, id="port-range"),
    pytest.param({"networkPolicy": {"enabled": "yes"}}, id="bool-as-string"),
    pytest.param({"agents": [{"name": "erp-agent", "system": "erp"}]}, id="agent-without-credentials"),
    pytest.param(with_agent(name="ERP_Agent"), id="agent-name-not-dns"),
    pytest.param(with_agent(shutdownGrace=-1), id="agent-negative-grace"),
    pytest.param(with_agent(colour="blue"), id="agent-unknown-key"),
    pytest.param(with_agent(storage={"size": "lots"}), id="agent-storage-size"),
    pytest.param(with_agent(flows=[{"name": "x"}]), id="agent-flows-not-toml-text"),
]


@pytest.mark.parametrize("values", BAD_VALUES)
def test_schema_refuses(values: dict[str, Any]) -> None:
    chart = helm.Chart.load(CHART)
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)
    report = helm.lint(CHART, values, strict=True)
    assert report["errors"] or report["messages"], report


def test_schema_accepts_good_agent() -> None:
    helm.Chart.load(CHART).validate_schema(with_agent(site="plant-1", shutdownGrace=2.5))


def test_created_secret_needs_creds() -> None:
    """An agent without an existing Secret must give the creds for the chart to create one."""
    values = copy.deepcopy(with_agent(credentials={}))
    with pytest.raises(helm.HelmError, match="existingSecret or creds"):
        render(values)


@pytest.mark.parametrize("values_file", CASES)
def test_control_plane_settings_load(values_file: Path | None, tmp_path: Path) -> None:
    """The control plane's settings.toml (``--config``) loads with this codebase's loader and
    carries the stream replicas the agents use."""
    from mesh.controlplane.settings import load_settings

    values = load_values(values_file)
    docs = render(values)
    (settings,) = [
        d["data"]["settings.toml"] for d in docs if d["kind"] == "ConfigMap" and "settings.toml" in d["data"]
    ]
    path = tmp_path / "settings.toml"
    path.write_text(settings)
    replicas = ((values or {}).get("nats") or {}).get("streamReplicas", 1)
    assert load_settings(path).streams.replicas == replicas
    for text in agent_configs(docs).values():
        assert f"[streams]\nreplicas = {replicas}\n" in text


def test_control_plane_runs_from_the_rendered_pod_spec(
    nats_server: SecuredNatsServer, tmp_path: Path
) -> None:
    """The control plane's container args, settings ConfigMap and security Secret mount, laid out
    on disk as kubelet would (each Secret item at its path), run a real control plane against the
    secured nats-server: it becomes ready and issues an enrollment token (so the security dir the
    Secret yields is complete)."""
    docs = kinds(render({"controlPlane": {"security": {"existingSecret": "mesh-security"}}}))
    (deploy,) = docs["Deployment"]
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    security = next(v for v in pod["volumes"] if v["name"] == "security")
    secdir = tmp_path / "security"
    for item in security["secret"]["items"]:
        # the README's `kubectl create secret` names each key after its path, '/' written '.'
        assert item["key"] == item["path"].replace("/", "."), item
        target = secdir / item["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((nats_server.security_dir / item["path"]).read_bytes())
    (settings,) = [d["data"]["settings.toml"] for d in docs["ConfigMap"] if "settings.toml" in d["data"]]
    (tmp_path / "settings.toml").write_text(settings)
    port = free_port()
    args = []
    for arg in container["args"]:
        arg = arg.replace("/etc/mesh/security", str(secdir))
        arg = arg.replace("/etc/mesh/control-plane/settings.toml", str(tmp_path / "settings.toml"))
        arg = arg.replace("$(POD_NAME)", "cp-helm-0")
        if arg.startswith("--nats="):
            arg = f"--nats={nats_server.url}"
        if arg.startswith("--http="):
            arg = f"--http=127.0.0.1:{port}"
        args.append(arg)
    assert args[:2] == ["control-plane", "run"]
    assert f"--security-dir={secdir}" in args
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    log_path = tmp_path / "cp.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mesh", *args],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env,
        )  # fmt: skip
        try:
            try:
                wait_ready(f"http://127.0.0.1:{port}/readyz", timeout=30, alive=lambda: proc.poll() is None)
            except NotReady as exc:
                raise AssertionError(f"control plane: {exc}\n{log_path.read_text()[-3000:]}") from None
            done = subprocess.run(
                [sys.executable, "-m", "mesh", "agent", "token", "create", "--name", "crm-agent",
                 "--system", "crm", "--ttl", "10m", "--output", str(tmp_path / "crm.token"),
                 "--control-plane", nats_server.url, "--creds", str(nats_server.admin_creds)],
                capture_output=True, text=True, timeout=60, env=env,
            )  # fmt: skip
            assert done.returncode == 0, done.stdout + done.stderr + log_path.read_text()[-3000:]
            assert (tmp_path / "crm.token").read_text().startswith("MESHENROLL1.")
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


ERP_FLOWS = """[[flows]]
name = "customers"
entity = "customer"

[flows.source]
adapter = "sqlite"
path = "/var/lib/mesh/erp.db"
table = "customers"
key = "id"
mode = "changes"
"""


def test_agent_runs_from_the_rendered_pod_spec(nats_server: SecuredNatsServer, tmp_path: Path) -> None:
    """An agent's StatefulSet pod, laid out on disk: the init container copies the creds Secret
    (least-privilege creds of ``meshctl security issue-agent``) to the writable creds volume, the
    agent runs with the container's args on the ConfigMap's agent.toml, and the probes' paths
    answer on its metrics port: /healthz 200, /readyz 200 once it is ready."""
    from tests._secure import create_layout, issue_agent_creds
    from tests.integration._harness import make_erp

    values = {
        "nats": {"url": "nats://nats:4222"},
        "agents": [
            {"name": "erp-agent", "system": "erp", "credentials": {"existingSecret": "x"}, "flows": ERP_FLOWS}
        ],
    }
    docs = kinds(render(values))
    (sts,) = docs["StatefulSet"]
    pod = sts["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    (agent,) = pod["containers"]
    (text,) = agent_configs(docs["ConfigMap"]).values()
    state, etc = tmp_path / "state", tmp_path / "etc"
    for d in (state, etc / "creds", etc / "creds-secret", etc / "config"):
        d.mkdir(parents=True)
    port = free_port()
    text = text.replace(STATE_MOUNT, str(state)).replace("/etc/mesh/", f"{etc}/")
    text = text.replace('"nats://nats:4222"', f'"{nats_server.url}"')
    text = text.replace("metrics_port = 9464", f"metrics_port = {port}").replace('"0.0.0.0"', '"127.0.0.1"')
    config = etc / "config" / "agent.toml"
    config.write_text(text)
    make_erp(state / "erp.db")
    # the Secret's agent.creds, as `meshctl security issue-agent` writes it
    issue_agent_creds(config, nats_server.security_dir, out=etc / "creds-secret" / "agent.creds")
    create_layout(nats_server)

    def local(argv: list[str]) -> list[str]:
        return [a.replace("/etc/mesh/", f"{etc}/") for a in argv]

    assert init["command"][0] == "python"
    done = subprocess.run(
        [sys.executable, *local(init["command"])[1:]], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert (etc / "creds" / "agent.creds").stat().st_mode & 0o777 == 0o600
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    log_path = tmp_path / "agent.log"
    ready, health = agent["readinessProbe"]["httpGet"]["path"], agent["livenessProbe"]["httpGet"]["path"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mesh", *local(agent["args"])],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env,
        )  # fmt: skip
        try:
            try:
                wait_ready(f"http://127.0.0.1:{port}{ready}", timeout=30, alive=lambda: proc.poll() is None)
            except NotReady as exc:
                raise AssertionError(f"agent: {exc}\n{log_path.read_text()[-3000:]}") from None
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{health}", timeout=10) as resp:
                assert resp.status == 200
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(pod["terminationGracePeriodSeconds"])
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    assert proc.returncode == 0, log_path.read_text()[-3000:]


# -- monitoring: the alert rules and the Grafana dashboard come from deploy/ ---------------------

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _monitoring_on() -> dict[str, Any]:
    return {
        "monitoring": {
            "prometheusRule": {"enabled": True},
            "grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "mesh"}},
        }
    }


def test_prometheus_rule_renders_the_deployed_rules() -> None:
    """One source: the PrometheusRule holds every group of deploy/prometheus/connector-mesh-rules.yaml
    unchanged (annotations' ``{{ $labels.x }}`` left for Prometheus), plus the chart's scrape alerts."""
    deployed = yaml.safe_load((DEPLOY / "prometheus" / "connector-mesh-rules.yaml").read_text())
    (rule,) = kinds(render(_monitoring_on()))["PrometheusRule"]
    groups = rule["spec"]["groups"]
    assert groups[: len(deployed["groups"])] == deployed["groups"]
    extra = groups[len(deployed["groups"]) :]
    assert [g["name"] for g in extra] == ["connector-mesh-targets"]
    alerts = [r["alert"] for g in groups for r in g["rules"] if "alert" in r]
    assert len(alerts) == len(set(alerts))
    for group in groups:
        for r in group["rules"]:
            if "alert" in r:
                assert r["labels"]["severity"] in {"critical", "warning"}, r["alert"]
                assert r["annotations"]["summary"], r["alert"]
                assert r["annotations"]["description"], r["alert"]
    assert "{{ $labels.flow }}" in str(groups)
    assert "{{ $labels.pod }}" in str(extra)
    jsonschema.validate(rule, CRD_SCHEMAS["PrometheusRule"])


def _dashboard_configmaps(values: dict[str, Any] | None) -> list[dict[str, Any]]:
    return [
        d
        for d in render(values)
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-grafana-dashboard")
    ]


def test_grafana_dashboard_configmap() -> None:
    """The dashboard ConfigMap carries the sidecar's label and deploy/grafana/connector-mesh.json
    byte for byte; off by default."""
    assert not _dashboard_configmaps(None)
    (cm,) = _dashboard_configmaps(_monitoring_on())
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "mesh"}
    deployed = (DEPLOY / "grafana" / "connector-mesh.json").read_text()
    assert cm["data"]["connector-mesh.json"] == deployed.rstrip("\n")
    kubernetes_validate.validate(cm, KUBE_VERSIONS[-1], strict=True)
    custom = _monitoring_on()
    custom["monitoring"]["grafanaDashboard"].update(
        sidecarLabel="grafana.example.com/dashboard", sidecarLabelValue="mesh"
    )
    (cm,) = _dashboard_configmaps(custom)
    assert cm["metadata"]["labels"]["grafana.example.com/dashboard"] == "mesh"
    assert "grafana_dashboard" not in cm["metadata"]["labels"]


def test_schema_refuses_a_bad_sidecar_label() -> None:
    bad = _monitoring_on()
    bad["monitoring"]["grafanaDashboard"]["sidecarLabel"] = "not a label"
    with pytest.raises(Exception, match="sidecarLabel"):
        render(bad)
