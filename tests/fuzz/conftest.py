"""Property-based fuzzing of the mesh's input boundaries (issue 10): the hypothesis profiles.

``ci`` (the default, in the suite): ~150 examples per target, no deadline, derandomized, so a run
is deterministic and quick. ``long``: 10,000 examples per target, random seeds, for
``scripts/fuzz.py`` (or ``MESH_FUZZ_PROFILE=long pytest tests/fuzz``). Like tests/unit, these
tests start no server: the guard of tests/unit applies here too.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

from tests.unit.conftest import pytest_runtest_setup, pytest_runtest_teardown  # noqa: F401 - the unit guard

PROFILES = ("ci", "long")
"""The profiles registered here; ``MESH_FUZZ_PROFILE`` picks one (default ``ci``)."""

settings.register_profile(
    "ci",
    max_examples=150,
    deadline=None,
    derandomize=True,
    print_blob=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "long",
    max_examples=10_000,
    deadline=None,
    derandomize=False,
    print_blob=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("MESH_FUZZ_PROFILE", "ci"))
