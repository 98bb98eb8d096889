"""The example plugin distribution in tests/plugins/jsonl, used as an operator would use it:
installed with pip, found through its entry point, checked by the real ``meshctl``.

These tests fail (never skip) when the distribution is not installed; CI installs it
(``.ci/run``). The contract suites (tests/contract) run on its drivers as well.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mesh.plugins import adapter_registry

HERE = Path(__file__).parent / "jsonl"


def meshctl(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("meshctl")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=60)


def test_the_registry_finds_the_plugin_through_its_entry_point() -> None:
    registry = adapter_registry()
    assert "jsonl" in registry.names("source")
    assert "jsonl" in registry.names("sink")
    assert "distribution mesh-jsonl-example 0.1.0" in registry.origins["jsonl"]
    assert registry["jsonl"].capabilities == {"source", "sink"}


def test_the_contract_suites_run_on_the_plugin_drivers() -> None:
    """tests/contract generates its Source and Sink tests for these drivers (mesh.contract_drivers)."""
    from tests.contract._drivers import SINK_DRIVERS, SOURCE_DRIVERS

    assert SOURCE_DRIVERS["jsonl"].__module__ == "mesh_jsonl.contract"
    assert SINK_DRIVERS["jsonl"].__module__ == "mesh_jsonl.contract"


def test_meshctl_config_check_accepts_a_config_using_the_plugin() -> None:
    result = meshctl("config", "check", str(HERE / "example.toml"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{HERE / 'example.toml'}: ok (agent jsonl-agent, 2 flow(s))"


def test_a_typo_in_the_plugin_config_names_file_field_path_and_expectation(tmp_path: Path) -> None:
    text = (HERE / "example.toml").read_text()
    bad = tmp_path / "agent.toml"
    both = text.replace("directory = ", "directroy = ").replace('key_field = "id"', "poll_interval = 0")
    bad.write_text(both)
    result = meshctl("config", "check", str(bad))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [  # every flow's problem, one per line
        f"{bad}: flows[0].source.poll_interval: expected `float` > 0.0",
        f"{bad}: flows[1].sink: object contains unknown field `directroy`",
    ]
    bad.write_text(text.replace("directory = ", "directroy = "))
    result = meshctl("config", "check", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip() == f"{bad}: flows[1].sink: object contains unknown field `directroy`"


def test_an_adapter_name_that_is_not_installed_lists_the_installed_ones(tmp_path: Path) -> None:
    bad = tmp_path / "agent.toml"
    bad.write_text((HERE / "example.toml").read_text().replace('adapter = "jsonl"', 'adapter = "jsonx"', 1))
    result = meshctl("config", "check", str(bad))
    assert result.returncode == 2
    assert f"{bad}: flows[0].source.adapter: invalid value 'jsonx'" in result.stderr
    assert "expected one of the installed source adapters: csv, jsonl, postgres, rest, sqlite, webhook" in (
        result.stderr
    )
