"""Crash points for tests: SIGKILL this process at a named step of the delivery path.

``MESH_CRASH_POINTS="apply.after_sink:0.05,relay.after_publish:0.02"`` makes
:func:`crash_point` kill the process with SIGKILL, with that probability, each time the named
step is reached. Unset (always, in production), a crash point costs one dict lookup.
Crash tests use it to land kills exactly inside the windows that matter (after the sink wrote,
before the inbox recorded; after JetStream acked, before the outbox row was removed), which
random timing alone hits only by luck.
"""

from __future__ import annotations

import os
import random
import signal

__all__ = ["CRASH_POINTS", "crash_point"]

CRASH_POINTS = (
    "capture.before_commit",
    "capture.after_commit",
    "relay.after_publish",
    "apply.after_sink",
    "apply.after_inbox",
    "api.after_claim",  # a System API call claimed its key in mesh_api_results, ran nothing yet
    "api.after_commit",  # a SQL operation committed (with its mesh_api_calls row), result not stored
)


def _parse(spec: str) -> dict[str, float]:
    points: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, prob = part.partition(":")
        if name not in CRASH_POINTS:
            raise ValueError(f"MESH_CRASH_POINTS: unknown crash point {name!r}; known: {CRASH_POINTS}")
        points[name] = float(prob or 1.0)
    return points


_ACTIVE = _parse(os.environ.get("MESH_CRASH_POINTS", ""))


def crash_point(name: str) -> None:
    """SIGKILL this process here with the probability configured for ``name`` (usually never)."""
    prob = _ACTIVE.get(name)
    if prob is not None and random.random() < prob:
        os.kill(os.getpid(), signal.SIGKILL)
