"""meshctl's exit codes are the four of mesh/cli/_exitcodes.py, and the README lists them."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import mesh.cli
from mesh.cli._exitcodes import BAD_INPUT, CODES, INTERRUPTED, NOT_OK, OK

ROOT = Path(__file__).resolve().parents[2]
CLI = Path(mesh.cli.__file__).parent


def _literal_codes() -> list[tuple[str, int]]:
    """(file:line, code) of every literal exit code in mesh/cli: ``typer.Exit(N)``,
    ``sys.exit(N)``, ``fail(..., N)`` / ``fail(..., code=N)``."""
    found = []
    for path in sorted(CLI.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            args: list[ast.expr] = []
            if name in ("Exit", "exit"):
                args = node.args[:1] + [k.value for k in node.keywords if k.arg == "code"]
            elif name in ("fail", "_fail"):
                args = node.args[1:2] + [k.value for k in node.keywords if k.arg == "code"]
            for arg in args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, int):
                    found.append((f"{path.name}:{node.lineno}", arg.value))
    return found


def test_every_literal_exit_code_in_the_cli_is_a_named_one() -> None:
    found = _literal_codes()
    assert found, "the scan finds nothing: it no longer sees how the CLI exits"
    strays = [(where, code) for where, code in found if code not in CODES]
    assert strays == [], f"exit codes outside mesh/cli/_exitcodes.py: {strays}"


def test_the_codes_are_the_conventional_ones() -> None:
    assert (OK, NOT_OK, BAD_INPUT, INTERRUPTED) == (0, 1, 2, 130)


def test_the_readme_lists_every_exit_code() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Exit codes", 1)[1].split("\n#", 1)[0]
    listed = {int(m) for m in re.findall(r"^\| `(\d+)` \|", section, flags=re.MULTILINE)}
    assert listed == set(CODES)
