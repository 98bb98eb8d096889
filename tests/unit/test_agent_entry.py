"""The lean agent entry (agents.entry): same arguments and errors as `meshctl agent run`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from agents.entry import main
from mesh.cli import main as meshctl_main


def test_bad_config_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(tmp_path / "missing.toml")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "missing.toml: cannot read config" in err
    assert err.count("\n") == 1
    assert "Traceback" not in err


def test_metrics_port_out_of_range_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(tmp_path / "a.toml"), "--metrics-port", "70000"])
    assert exc.value.code == 2
    assert "0<=x<=65535" in capsys.readouterr().err


def test_config_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "--config" in capsys.readouterr().err


def test_meshctl_agent_run_delegates_to_the_lean_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["meshctl", "agent", "run", "-c", str(tmp_path / "missing.toml")])
    with pytest.raises(SystemExit) as exc:
        meshctl_main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "missing.toml: cannot read config" in err
    assert "Traceback" not in err
