"""Every test here needs the example plugin installed: it fails (never skips) without it."""

from __future__ import annotations

from importlib import metadata

import pytest

INSTALL = "pip install ./tests/plugins/jsonl (from the repository root)"


@pytest.fixture(autouse=True)
def _plugin_installed() -> None:
    try:
        metadata.distribution("mesh-jsonl-example")
        return
    except metadata.PackageNotFoundError:
        pass
    pytest.fail(f"the example plugin is not installed: run `{INSTALL}`, as .ci/run does", pytrace=False)
