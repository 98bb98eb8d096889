from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from mesh.cli import app

runner = CliRunner()


def test_config_check_reports_every_bad_file_without_a_traceback(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[agent]\nname = "a"\nsystem = "erp"\nstate_dir = "s"\n')
    bad = tmp_path / "bad.toml"
    bad.write_text('[agent]\nname = "a"\nsystem = "erp"\nstate_dir = "s"\nmetrics_port = "x"\n')
    result = runner.invoke(app, ["config", "check", str(good), str(bad)])
    assert result.exit_code == 2
    assert f"{good}: ok (agent a, 0 flow(s))" in result.output
    assert f"{bad}: agent.metrics_port: expected `int | null`, got `str`" in result.output
    assert "Traceback" not in result.output


def test_agent_run_with_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["agent", "run", "--config", str(tmp_path / "missing.toml")])
    assert result.exit_code == 2
    assert "cannot read config" in result.output
    assert "Traceback" not in result.output
