"""Chaos suite: registers its marker here, since pyproject.toml is shared."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "chaos: a long sync under random SIGKILL/SIGSTOP/busy-target faults (MESH_CHAOS_SEED replays one)",
    )
