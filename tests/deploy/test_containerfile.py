"""The Containerfile, read as text (no image builds here): multi-stage, a slim final stage with
no compiler, a numeric non-root user, ``meshctl`` as the entrypoint; and a .containerignore that
keeps secrets, state and the virtualenv out of the build context."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONTAINERFILE = ROOT / "Containerfile"
IGNORE = ROOT / ".containerignore"
COMPILERS = ("gcc", "g++", "cc ", "clang", "build-essential", "make ", "python3-dev", "libc6-dev")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [arg for o, arg in self.instructions if o == op]


def _logical_lines(text: str) -> list[str]:
    """Instruction lines with ``\\`` continuations joined and comments dropped."""
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    assert not current, "the Containerfile ends inside a continued line"
    return lines


def _stages(text: str) -> tuple[dict[str, str], list[Stage]]:
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(text):
        op, _, rest = line.partition(" ")
        op = op.upper()
        rest = rest.strip()
        if op == "FROM":
            words = rest.split()
            words = [w for w in words if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif op == "ARG" and not stages:
            key, _, value = rest.partition("=")
            args[key] = value
        else:
            assert stages, f"{op} before the first FROM"
            stages[-1].instructions.append((op, rest))
    return args, stages


def _expand(text: str, args: dict[str, str]) -> str:
    for key, value in args.items():
        text = text.replace("${" + key + "}", value).replace("$" + key, value)
    return text


@pytest.fixture(scope="module")
def parsed() -> tuple[dict[str, str], list[Stage]]:
    return _stages(CONTAINERFILE.read_text(encoding="utf-8"))


def test_it_is_multi_stage_and_the_final_stage_is_slim_python(
    parsed: tuple[dict[str, str], list[Stage]],
) -> None:
    args, stages = parsed
    assert len(stages) >= 2
    final = stages[-1]
    base = _expand(final.base, args)
    image, _, tag = base.rpartition(":")
    assert image.endswith("python"), base
    assert "slim" in tag, base
    assert tag.split("-")[0].startswith("3."), base
    # The final stage takes the build's result from an earlier stage, not from a compiler of its own.
    assert any(arg.startswith("--from=") for arg in final.all("COPY")), final.all("COPY")


def test_the_final_stage_has_no_compiler(parsed: tuple[dict[str, str], list[Stage]]) -> None:
    _, stages = parsed
    final = stages[-1]
    for op, arg in final.instructions:
        text = f" {arg} "
        for tool in COMPILERS:
            assert tool not in text, f"{op} {arg}: {tool.strip()} in the final stage"
    # And the compiler is where the build needs it (so a dependency without a wheel builds).
    assert any("build-essential" in arg for arg in stages[0].all("RUN"))


def test_it_runs_as_a_numeric_non_root_user(parsed: tuple[dict[str, str], list[Stage]]) -> None:
    _, stages = parsed
    users = stages[-1].all("USER")
    assert users, "the final stage sets no USER"
    user, _, group = users[-1].partition(":")
    assert user.isdigit(), f"USER {users[-1]}: numeric, so runAsNonRoot can check it"
    assert int(user) != 0
    assert not group or (group.isdigit() and int(group) != 0)
    # Nothing after USER switches back to root.
    ops = [op for op, _ in stages[-1].instructions]
    assert "RUN" not in ops[ops.index("USER") :]


def test_the_entrypoint_is_meshctl(parsed: tuple[dict[str, str], list[Stage]]) -> None:
    _, stages = parsed
    entry = stages[-1].all("ENTRYPOINT")
    assert entry
    argv = json.loads(entry[-1])  # exec form: signals reach meshctl, not a shell
    assert isinstance(argv, list)
    assert Path(argv[0]).name == "meshctl"
    cmd = json.loads(stages[-1].all("CMD")[-1])
    assert cmd[:2] == ["agent", "run"]
    # The virtualenv the entrypoint lives in is the one the build stage made and the final copied.
    venv = str(Path(argv[0]).parent.parent)
    assert any(shlex.split(arg)[-1] == venv for arg in stages[-1].all("COPY") if arg.startswith("--from="))


def test_the_build_context_leaves_out_secrets_state_and_the_virtualenv() -> None:
    patterns = {
        line.strip()
        for line in IGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    for must in (".git", ".venv", "*.creds", "*.db", "tests"):
        assert must in patterns, must
    # What the build copies is not ignored.
    _, stages = _stages(CONTAINERFILE.read_text(encoding="utf-8"))
    copied = {src.rstrip("/") for arg in stages[0].all("COPY") for src in shlex.split(arg)[:-1]}
    assert {"pyproject.toml", "mesh", "agents", "adapters"} <= copied
    for path in sorted(copied):
        assert path not in patterns, path
        assert (ROOT / path).exists(), path
