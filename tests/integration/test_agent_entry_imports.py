"""`meshctl agent run` and `python -m agents` load the agent runtime only, not the operator CLI
(issue 16: agent peak RSS; the CLI alone adds several MB to every agent process)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

_PROBE = """
import atexit, sys
atexit.register(lambda: print(sorted(m for m in ("typer", "click", "mesh.cli.main") if m in sys.modules)))
sys.argv = {argv!r}
{run}
"""


@pytest.mark.parametrize(
    ("argv", "run"),
    [
        (["meshctl", "agent", "run", "--config", "CFG"], "from mesh.cli import main; main()"),
        (
            ["python -m agents", "--config", "CFG"],
            "import runpy; runpy.run_module('agents', run_name='__main__')",
        ),
    ],
)
def test_agent_entry_does_not_import_the_cli(tmp_path: Path, argv: list[str], run: str) -> None:
    argv = [str(tmp_path / "missing.toml") if a == "CFG" else a for a in argv]
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE.format(argv=argv, run=run)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ")
    assert "missing.toml: cannot read config" in proc.stderr
    assert proc.stdout.strip() == "[]"


def test_meshctl_agent_run_help_still_comes_from_the_cli() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mesh", "agent", "run", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "--metrics-port" in proc.stdout


def test_the_agent_runtime_does_not_load_test_only_modules() -> None:
    # The in-memory transport is for tests; an agent process must not carry it (issue 16).
    probe = (
        "import sys\n"
        "import agents.entry, agents.runner, agents.connector, mesh.transport.jetstream\n"
        "print(sorted(m for m in ('mesh.transport.memory', 'typer', 'mesh.cli.main') if m in sys.modules))\n"
        "from mesh.transport import MemoryTransport\n"
        "print(MemoryTransport.__module__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["[]", "mesh.transport.memory"]  # still there when asked for
