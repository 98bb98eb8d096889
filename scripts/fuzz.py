#!/usr/bin/env python3
"""The long fuzzing run: every property of tests/fuzz/ with the hypothesis profile ``long``
(10,000 examples per target, random seeds), one target after another.

    .venv/bin/python scripts/fuzz.py                # everything, 10,000 examples per target
    .venv/bin/python scripts/fuzz.py -k mapping     # targets whose module or name contains "mapping"
    .venv/bin/python scripts/fuzz.py --examples 50000 --seed 7

Prints one line per target (cases run, seconds, ok or FAILED) and a total; a failure prints the
falsifying example and how to reproduce it. Exit code 0 when every target held, 1 otherwise.
The short run of the same properties is part of the test suite (``pytest tests/fuzz``,
profile ``ci``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MESH_FUZZ_PROFILE", "long")


def _targets(pattern: str | None) -> list[tuple[str, Callable[..., Any]]]:
    """Every hypothesis test of tests/fuzz/test_fuzz_*.py, as (module.name, function)."""
    found = []
    for file in sorted((ROOT / "tests" / "fuzz").glob("test_fuzz_*.py")):
        module = importlib.import_module(f"tests.fuzz.{file.stem}")
        for name, fn in vars(module).items():
            if name.startswith("test_") and hasattr(fn, "hypothesis"):
                label = f"{file.stem.removeprefix('test_fuzz_')}.{name.removeprefix('test_')}"
                if pattern is None or pattern in label:
                    found.append((label, fn))
    return found


def _counting(fn: Callable[..., Any], counter: list[int]) -> None:
    """Count the cases hypothesis runs through ``fn`` (its documented ``inner_test`` hook)."""
    inner = fn.hypothesis.inner_test  # type: ignore[attr-defined]

    def counted(*args: Any, **kwargs: Any) -> Any:
        counter[0] += 1
        return inner(*args, **kwargs)

    fn.hypothesis.inner_test = counted  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", dest="pattern", help="only targets whose name contains this text")
    parser.add_argument("--examples", type=int, default=10_000, help="examples per target (default 10,000)")
    parser.add_argument("--seed", type=int, default=None, help="seed of every target (default: random)")
    args = parser.parse_args(argv)

    from hypothesis import seed, settings

    import tests.fuzz.conftest  # noqa: F401 - registers the profiles

    settings.register_profile("long-run", settings.get_profile("long"), max_examples=args.examples)
    settings.load_profile("long-run")

    targets = _targets(args.pattern)
    if not targets:
        print(f"no fuzz target matches {args.pattern!r}", file=sys.stderr)
        return 1
    width = max(len(label) for label, _ in targets)
    print(f"{'target':<{width}}  {'cases':>8}  {'seconds':>8}  result", flush=True)
    failed: list[str] = []
    total_cases, started = 0, time.monotonic()
    for label, fn in targets:
        counter = [0]
        _counting(fn, counter)
        run = seed(args.seed)(fn) if args.seed is not None else fn
        t0 = time.monotonic()
        try:
            run()
        except Exception as exc:
            result = f"FAILED: {type(exc).__name__}"
            failed.append(label)
            print(f"--- {label} ---", file=sys.stderr)
            traceback.print_exception(exc, file=sys.stderr)
        else:
            result = "ok"
        elapsed = time.monotonic() - t0
        total_cases += counter[0]
        print(f"{label:<{width}}  {counter[0]:>8,}  {elapsed:>8.1f}  {result}", flush=True)
    print(
        f"{'total':<{width}}  {total_cases:>8,}  {time.monotonic() - started:>8.1f}  "
        + (f"{len(failed)} FAILED: {', '.join(failed)}" if failed else f"{len(targets)} targets ok"),
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
